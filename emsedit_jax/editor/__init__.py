"""The editing algorithm: capture -> hypernetwork -> ridge solve -> apply, T steps."""
