"""Fault and bad-input sweeps: each module tries one area's bad inputs and faults and prints tried / clean counts."""
