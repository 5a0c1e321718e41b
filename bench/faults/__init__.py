"""The fault matrix (issue 8): every fault row against a private stack, figures per row."""
