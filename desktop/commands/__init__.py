"""The `specd` subcommands (chat, demo), building a client from the config, the local verifier."""
