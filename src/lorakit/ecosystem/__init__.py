"""lorakit inside other libraries: `install_as_peft()` (as_peft.py) makes `import peft` resolve to lorakit for TRL,
transformers and accelerate; the import hook behind it and the old module paths (module_aliases.py); PEFT's module
tree as lorakit's objects (peft_namespace.py) and the few PEFT functions only that integration calls
(peft_functions.py, weight_mapping.py, auto_models.py); the checks that name the switch when TRL or transformers'
Trainer is handed a lorakit object without it (guards.py)."""
