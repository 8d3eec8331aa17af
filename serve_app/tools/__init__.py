"""Tool calling: tools into the prompt, calls out of the reply (parsed as data), streamed calls, forced calls."""
