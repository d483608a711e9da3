"""The public API, one module per operator (functional and nn.Module); ``_args`` is shared."""
