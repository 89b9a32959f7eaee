"""elbolab: latent-variable models as Pyro programs, and the one lower bound behind EM and the VAE.

Subpackages
-----------
- :mod:`elbolab.models`     -- Pyro programs p(z) p(x | z; theta)
- :mod:`elbolab.guides`     -- variational families q(z | x), including the exact posterior
- :mod:`elbolab.inference`  -- EM, direct maximum likelihood, and what they share
- :mod:`elbolab.datasets`   -- bundled and offline data

Parameters of every model and guide live in the module that owns them
(``pyro.settings`` ``module_local_params=True``), never in Pyro's global param store,
so several models can be fitted side by side in one notebook.
"""

import pyro

pyro.settings.set(module_local_params=True)

__version__ = "0.1.0"
