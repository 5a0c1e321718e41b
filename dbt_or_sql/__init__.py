"""The SQL migrations (NNNN_name[.apache|.timescale].sql), shipped as package data and found
through importlib.resources by nadi.db.migrate."""
