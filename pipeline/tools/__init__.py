"""Commands that exercise the product (benchmark, soak, demo, truth comparison); nothing in the product imports them."""
