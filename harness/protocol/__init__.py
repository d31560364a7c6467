"""A protocol's rules, independent of the task: how a prompt becomes model input (``prompting``: chat
template, truncation, special tokens) and which stop ids and minimum lengths a reference script used per
dataset (``generation_rules``).

May import: ``methods`` (for ``ConfigError``), torch. Nothing else of the harness.
"""
