"""Definitions both sides of the wire share, in numpy and protobuf only (no torch, no grpc).

The server and the client import these; this package imports neither of them, so the client
still installs without torch and the two sides cannot drift apart.
"""
