"""Generation for the chat deployment: turning prompt token ids into exact text increments."""
