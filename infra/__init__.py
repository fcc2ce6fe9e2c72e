"""What starts the real services locally (`pruneflow up`) and what a team deploys."""
