"""`fitserve check-quant`: how far a quantized setting's next-token predictions are from --dtype's."""
