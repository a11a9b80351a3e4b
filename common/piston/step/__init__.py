"""The step layer: the bottom of Piston, shared by every process and every platform.

It imports neither torch nor jax, and nothing else of ``piston``: the front end, the
scheduler, the executors and every platform's model runner build on it, and none of it
builds on them. It holds

- the settings: ``config`` (EngineConfig, and ModelConfig with the model's shape facts
  derived once), ``config_codec`` (the config as bytes for another process), ``hf_config``
  and ``gguf_metadata`` (a checkpoint's Hugging Face config), ``sampling_params``;
- the wire types, one file per message family: ``engine_messages`` (front end <-> EngineCore),
  ``scheduler_output`` (EngineCore -> workers), ``runner_output`` (workers -> EngineCore),
  ``worker_messages`` (executor <-> worker processes);
- the step every model runner takes: ``input_batch`` (the persistent numpy batch and the
  scheduler's diff applied to it), ``sampling_batch`` (the sampled rows' parameters),
  ``model_runner`` (apply the diff, choose the rows to sample, prompt-logprob spans,
  assemble the output; a platform supplies only device inputs, forward and sampling),
  ``rope`` (numpy RoPE tables) and ``tp_layout`` (how tensor parallelism splits heads).
"""
