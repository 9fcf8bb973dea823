"""What a trajectory shows: which tools write, the goal it achieved, its names and dates, and
whether a prompt covers that goal; and the trajectory as prompt text."""
