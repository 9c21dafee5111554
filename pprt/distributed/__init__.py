"""Where stages run and how they talk: workers, executors, the stage process, transports, step plans."""
