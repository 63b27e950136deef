"""Training: the loop, and its parts by job: collect, plan, learn, checkpoint."""
