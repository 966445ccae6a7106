"""`AdapterTrainer`: kept for one release as another name of transformers' `Trainer`.

`import lorakit` makes the plain `Trainer` save, resume and reload-best a lorakit model through its adapter files
(ecosystem/guards.py, ecosystem/trainer_adapter_io.py), so no subclass is needed:

    from transformers import Trainer
    trainer = Trainer(model=peft_model, args=TrainingArguments(...), train_dataset=rows)
    trainer.train(); trainer.save_model("out")   # out/ loads with PeftModel.from_pretrained
"""

from transformers import Trainer as AdapterTrainer  # noqa: F401
