"""The bias probe (`chatrlhf eval --bias`, docs/bias.md): counterfactual prompt sets and the gaps between groups."""
