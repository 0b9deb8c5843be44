"""The `swarm` command line. `entry` is where the console script enters (it imports nothing of
the daemon extra until it knows it is installed); `root` is the command and its subcommands."""
