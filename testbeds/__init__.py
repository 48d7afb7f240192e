"""Testbeds (``tamp_fx.testbeds``): the trained fixtures, their VQA, the demo and tiny random
models. They depend on the library; the library never imports them."""
