"""The parties: the site, the aggregator and the scripted-rounds client, their step results,
quarantine records and the one loop that drives every role."""
