"""Tool sub-commands of the CLI (auto-discovered by chatforge.cli): each module has add_arguments(parser) and main(args, rest) -> int."""
