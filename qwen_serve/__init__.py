"""qwen-serve: a readable, fast server for Qwen2-architecture language models."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # The engine pulls in torch; import it only when asked so that `qwen_serve.cli --help` stays quick.
    if name == "LLM":
        from qwen_serve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from qwen_serve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
