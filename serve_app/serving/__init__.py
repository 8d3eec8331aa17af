"""What the routes do: turn validated requests into handle calls and handle results into responses."""
