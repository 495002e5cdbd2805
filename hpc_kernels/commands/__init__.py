"""One module per subcommand (HELP, add_arguments, run)."""
