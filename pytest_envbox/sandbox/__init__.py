"""The sandbox layer: the plan of one service's sandbox, and the code that carries it out in a
freshly forked process (its root filesystem, its init, the service's exec)."""
