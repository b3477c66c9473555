"""The kernel layer: system calls, netlink and nf_tables messages, seccomp programs, cgroups.

Nothing here knows about services or environments; every module wraps one kernel mechanism.
Imported by the lean supervisor: keep these imports cheap.
"""
