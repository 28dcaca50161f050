"""The exec driver: an allocation's tasks run as processes the agent starts and watches.

spec.py        pure: a task, its restart policy and logs, from Nomad's JSON
state.py       pure: TaskState and TaskEvent in Nomad's shape
env.py         pure: directories and the runtime environment, interpolation
restarts.py    pure: the restart decision (Nomad's restart tracker), injected clock
process.py     adapter: spawn (in a namespace), watch by pidfd, signal, adopt, find
logs.py        adapter: the task pipes, rotated log files, reading them back
cgroups.py     adapter: a cgroup v2 per task with its memory limit, where possible
supervisor.py  state: one task's life (start, restart, stop, detach)
"""
