"""abliterate: find the refusal direction of a chat model, remove it from the weights, and prove what the edit did.

The modules follow the job's data flow: prompts -> chat -> activations -> direction -> selection (measure),
architectures -> weights -> checkpoint (apply), generation -> evaluation -> judge (eval), card -> hub -> pipeline (run).
"""

__version__ = "0.1.0"
