"""What every experiment shares: steps (prepare/run/plot), app servers, real clients, plots."""
