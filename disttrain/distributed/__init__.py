"""Where this process is and how it joins the job: launcher environment, process group, local launcher, Slurm."""
