"""The run command's parts: the config and command line, checks before a run, the baseline choice, the Flex Template."""
