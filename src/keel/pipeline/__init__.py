"""The code-completion pipeline: languages, prompt building, postprocessing."""
