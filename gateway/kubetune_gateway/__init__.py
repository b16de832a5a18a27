"""kubetune's OpenAI-compatible fine-tuning gateway: the OpenAI SDK's fine-tuning calls onto FineTuneJobs.

Read :mod:`kubetune_gateway.app` (the HTTP routes) first, then :mod:`kubetune_gateway.mapping`
(pure functions: an OpenAI request in, a FineTuneJob out; a FineTuneJob in, OpenAI objects out).
"""
