"""Integrations with other libraries: transformers' quantizer registry (``quant_method: "sqakd"``)."""
