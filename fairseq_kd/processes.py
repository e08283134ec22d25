"""Worker processes: the cores they may use, and not outliving the command that started them."""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid):
    """Have the kernel kill this process when its parent exits (Linux; elsewhere nothing).

    A worker orphaned by a killed run would go on writing chunks next to the
    rerun that resumes them.  ``parent_pid`` closes the race of a parent that
    died before this call: then the worker exits at once.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def usable_cores():
    """The cores this process may run on (containers, taskset), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
