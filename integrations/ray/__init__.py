"""layertap for Ray Data (``pip install 'layertap[ray]'``): work in progress (issue 20)."""
