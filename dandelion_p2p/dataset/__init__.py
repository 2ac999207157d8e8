"""The dataset: packing into content-addressed chunks, leasing them to peers, serving them."""
