"""The benchmark (`make bench`): the real daemons and the real client against a bare floor."""
