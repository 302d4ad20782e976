"""The decoding engine: argument checks, stop flags, output types, the padded and packed forwards, the Jacobi
loop, the AR and prompt-lookup baselines and transformers' `generate` adapter. It imports only torch and
transformers (and nothing of the project outside itself): `training.shipping` bundles it into every CLLM.
"""
