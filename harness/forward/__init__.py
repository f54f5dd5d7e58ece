"""Forward passes of full-size models in bounded memory, with the models' own code.

A model is built by transformers from its config on the meta device (no weights), the adapter
model by peft on such a skeleton, and every layer is materialised from the original safetensors
files just before it runs and dropped after (``forward.stream``), under one memory budget
(``--merge-memory``). Modules: ``compute`` (the compute dtype a CPU runs fastest exactly),
``skeleton`` (models without weights), ``plan`` (which stored tensors make each parameter),
``units`` (the layers streamed as one), ``pool`` (the budget and the layers kept between
passes), ``stream`` (the hooks that read, cast and place each layer).
"""
