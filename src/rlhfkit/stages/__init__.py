"""One module per stage: `run(config) -> result dict`; the stage loop lives here."""
