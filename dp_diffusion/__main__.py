from dp_diffusion.cli import main

main()
