"""Everything that touches a model, data or disk: loading, the compression hook, generation,
tasks, results, reports. Imports ``methods``; ``methods`` never imports this package."""
