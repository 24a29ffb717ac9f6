"""Training: the forward/backward step, optimizer and schedule, metrics, and the loop."""
