"""The domain data the stages and the API share: the rule base (categories, rules, model output
schemas) and the reward characters."""
