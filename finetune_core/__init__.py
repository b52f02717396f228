"""finetune-serve core: data, model, training loop, evaluation, export and registry. No HTTP here."""
