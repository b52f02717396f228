"""The finetune-serve service: BentoML services, REST endpoints, the durable job store and the trainer."""
