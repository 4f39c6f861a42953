"""Dev mode only: an in-process issuer of workload and person tokens. Never used outside --dev."""
