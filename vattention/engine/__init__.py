"""The engine: sampling params, requests, scheduler and sampler (model runner and `LLM` build on
these). Data flows explicitly: `Scheduler.schedule()` -> model -> `Sampler` ->
`Scheduler.update()`."""
