"""The service's shared layer: settings, persistence, storage and the domain logic that the API,
the worker and the CLI all call. Torch-free: it validates requests with `mola.allocation` and
`mola.config`, and imports the rest of `mola` only inside functions that run in the worker or CLI.
"""
